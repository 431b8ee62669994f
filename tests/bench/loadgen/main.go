// Command loadgen sends HTTP requests at a fixed rate (open loop) and reports
// latency percentiles as JSON.
//
// Why not wrk: wrk is closed loop, so it measures throughput but hides queueing
// (a slow response delays the next request instead of piling up). Latency at a
// fixed rate must be measured from when each request was due, which is what
// this does. Why not Python: at a thousand requests a second the client's own
// event loop would be the bottleneck it is meant to measure around.
//
// The first -warmup of requests is sent at the same rate but not recorded:
// until then the client is still opening connections and the server is still
// warming them, which is start-up, not the steady state being measured.
// Connections are capped (-conns) like any real client pool: in a stall, a
// request waits for a free connection (and its wait counts) instead of
// opening yet another one, which would add accept() work to the stalled
// server.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	url := flag.String("url", "", "target URL")
	rate := flag.Float64("rate", 100, "requests per second")
	duration := flag.Duration("duration", 5*time.Second, "how long to send")
	warmup := flag.Duration("warmup", time.Second, "how long to send first, at the same rate, without recording")
	conns := flag.Int("conns", 64, "most connections open at once; more requests wait for one")
	var extra headers
	flag.Var(&extra, "H", "header 'Name: value' (repeatable)")
	flag.Parse()
	if *url == "" || *rate <= 0 {
		fmt.Fprintln(os.Stderr, "usage: loadgen -url URL -rate N [-duration 5s] [-H 'Name: value']")
		os.Exit(2)
	}

	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxConnsPerHost: *conns, MaxIdleConnsPerHost: *conns, IdleConnTimeout: 30 * time.Second},
	}
	skip := int(*rate * warmup.Seconds())
	count := skip + int(*rate*duration.Seconds())
	latencies := make([]time.Duration, 0, count)
	errors := 0
	var mu sync.Mutex
	var wg sync.WaitGroup
	interval := time.Duration(float64(time.Second) / *rate)
	start := time.Now()
	for i := 0; i < count; i++ {
		due := start.Add(time.Duration(i) * interval)
		time.Sleep(time.Until(due))
		wg.Add(1)
		go func(i int, due time.Time) {
			defer wg.Done()
			ok := send(client, *url, extra)
			elapsed := time.Since(due)
			mu.Lock()
			defer mu.Unlock()
			if !ok {
				errors++ // in the warm-up too: any error fails the run
			} else if i >= skip {
				latencies = append(latencies, elapsed)
			}
		}(i, due)
	}
	wg.Wait()

	sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"recorded": count - skip, "errors": errors,
		"p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
	})
	if errors > 0 {
		os.Exit(1)
	}
}

func send(client *http.Client, url string, extra headers) bool {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return false
	}
	for _, h := range extra {
		name, value, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode < 400
}

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
