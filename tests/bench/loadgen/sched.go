package main

import (
	"runtime"
	"syscall"
	"time"
)

// PR_SET_TIMERSLACK, from <linux/prctl.h>.
const prSetTimerSlack = 29

// dispatch releases count jobs, one every interval from start, and then
// closes jobs.
//
// Not with time.Sleep: with nothing else to run, Go's scheduler waits for its
// next timer in epoll_wait, whose timeout is in whole milliseconds, so a
// 150 µs sleep takes 1.05 ms. At a thousand requests a second and more the
// schedule would go out in bursts a millisecond apart, and each request's
// lateness would count as the server's latency. So the dispatcher has an OS
// thread of its own, which sleeps in nanosleep, to the microsecond.
func dispatch(jobs chan<- job, start time.Time, interval time.Duration, count int) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// The kernel may otherwise defer a sleeper's wake-up by 50 µs to batch it with others.
	syscall.RawSyscall(syscall.SYS_PRCTL, prSetTimerSlack, 1, 0)
	for i := 0; i < count; i++ {
		due := start.Add(time.Duration(i) * interval)
		for wait := time.Until(due); wait > 0; wait = time.Until(due) {
			ts := syscall.NsecToTimespec(int64(wait))
			syscall.Nanosleep(&ts, nil) // interrupted (EINTR): the loop sleeps again
		}
		jobs <- job{index: i, due: due}
	}
	close(jobs)
}
