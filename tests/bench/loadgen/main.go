// Command loadgen sends HTTP requests at a fixed rate (open loop) and reports
// latency percentiles as JSON.
//
// Why not wrk: wrk is closed loop, so it measures throughput but hides queueing
// (a slow response delays the next request instead of piling up). Latency at a
// fixed rate must be measured from when each request was due, which is what
// this does. Why not Python: at a thousand requests a second the client's own
// event loop would be the bottleneck it is meant to measure around.
//
// Why not net/http: its client costs about 250 µs of CPU per request here
// (a goroutine per request, and a reader and a writer goroutine per
// connection, handing off across threads). On a 2-core machine that is 40%
// of a core at 1,600 requests a second, taken from the server being
// measured. A fixed set of connections, each with one goroutine that writes
// a prepared request and reads the answer, costs a fraction of that.
//
// Requests go out on schedule to within some microseconds, not in bursts: a
// dispatcher on an OS thread of its own sleeps in nanosleep between them
// (sched.go). With time.Sleep they left up to a millisecond late, and that
// lateness was counted as the server's.
//
// The first -warmup of requests is sent at the same rate but not recorded:
// until then the client is still opening connections and the server is still
// warming them, which is start-up, not the steady state being measured.
//
// It also reports the rate it achieved: recorded responses over the span from
// the first recorded request's due time to the last response. A server that
// cannot keep up answers at its own pace, a queue grows, and its p50 grows
// with it; p99 / p50 then shrinks and looks better, so the caller must know
// that the rate asked for was not the rate served. (A server that keeps up
// falls short only by its last response's latency over -duration.)
// With -trace it also lists every recorded request: when it was due (Unix
// time, ms) and its latency (ms), so that a caller can split one steady
// stream of requests by what else was happening at the time (a login storm
// switched on and off, say) without restarting the client for each part.
// Connections are capped (-conns) like any real client pool: in a stall, a
// request waits for a free connection (and its wait counts) instead of
// opening yet another one, which would add accept() work to the stalled
// server.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"
)

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

// job is one request: its place in the schedule and when it was due.
type job struct {
	index int
	due   time.Time
}

func main() {
	target := flag.String("url", "", "target URL (http only)")
	rate := flag.Float64("rate", 100, "requests per second")
	duration := flag.Duration("duration", 5*time.Second, "how long to send")
	warmup := flag.Duration("warmup", time.Second, "how long to send first, at the same rate, without recording")
	conns := flag.Int("conns", 64, "most connections open at once; more requests wait for one")
	// Two at least: the dispatcher holds one through each of its sleeps, and
	// the connections need another meanwhile (with one, requests waited up to
	// 10 ms for it). It costs no more CPU than one did.
	procs := flag.Int("procs", 2, "OS threads running Go code at once (GOMAXPROCS), at least 2")
	trace := flag.Bool("trace", false, "list every recorded request's due time and latency")
	var extra headers
	flag.Var(&extra, "H", "header 'Name: value' (repeatable)")
	flag.Parse()
	parsed, err := url.Parse(*target)
	if *target == "" || *rate <= 0 || *procs < 2 || err != nil || parsed.Scheme != "http" {
		fmt.Fprintln(os.Stderr, "usage: loadgen -url http://HOST:PORT/PATH -rate N [-duration 5s] [-procs N, 2 or more] [-H 'Name: value']")
		os.Exit(2)
	}
	runtime.GOMAXPROCS(*procs)

	address := parsed.Host
	if parsed.Port() == "" {
		address += ":80"
	}
	request := buildRequest(parsed, extra)
	skip := int(*rate * warmup.Seconds())
	count := skip + int(*rate*duration.Seconds())

	// Buffered for the whole schedule: the dispatcher never waits for a
	// connection, so a stall delays responses, never the schedule.
	jobs := make(chan job, count)
	results := make([]result, *conns)
	var wg sync.WaitGroup
	for c := range results {
		wg.Add(1)
		go func(r *result) {
			defer wg.Done()
			r.run(address, request, jobs, skip)
		}(&results[c])
	}

	interval := time.Duration(float64(time.Second) / *rate)
	start := time.Now()
	dispatch(jobs, start, interval, count)
	wg.Wait()

	var latencies []time.Duration
	var samples [][2]float64
	errors := 0
	var firstError string
	var last time.Time // the last recorded response
	for _, r := range results {
		latencies = append(latencies, r.latencies...)
		if *trace {
			for i, latency := range r.latencies {
				samples = append(samples, [2]float64{milliseconds(r.dues[i].UnixNano()), milliseconds(int64(latency))})
			}
		}
		errors += r.errors // in the warm-up too: any error fails the run
		if firstError == "" {
			firstError = r.firstError
		}
		if r.last.After(last) {
			last = r.last
		}
	}
	achieved := 0.0
	if span := last.Sub(start.Add(time.Duration(skip) * interval)); len(latencies) > 0 && span > 0 {
		achieved = float64(len(latencies)) / span.Seconds()
	}
	sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
	report := map[string]any{
		"recorded": len(latencies), "errors": errors, "rate": *rate, "achieved_rps": achieved,
		"p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
	}
	if *trace {
		report["samples"] = samples // [due (Unix ms), latency (ms)]
	}
	json.NewEncoder(os.Stdout).Encode(report)
	if errors > 0 {
		fmt.Fprintln(os.Stderr, "first error:", firstError)
		os.Exit(1)
	}
}

func buildRequest(u *url.URL, extra headers) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\n", u.RequestURI(), u.Host)
	for _, h := range extra {
		name, value, _ := strings.Cut(h, ":")
		fmt.Fprintf(&b, "%s: %s\r\n", strings.TrimSpace(name), strings.TrimSpace(value))
	}
	b.WriteString("\r\n")
	return []byte(b.String())
}

func milliseconds(nanoseconds int64) float64 { return float64(nanoseconds) / 1e6 }

func percentile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	index := int(q*float64(len(sorted))+0.5) - 1
	if index < 0 {
		index = 0
	}
	if index >= len(sorted) {
		index = len(sorted) - 1
	}
	return float64(sorted[index].Microseconds()) / 1000
}
