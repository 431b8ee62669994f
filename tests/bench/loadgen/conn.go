package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

const ioTimeout = 10 * time.Second

// result is what one connection saw; each goroutine owns its own, so
// recording takes no lock.
type result struct {
	latencies  []time.Duration
	dues       []time.Time // when each of latencies' requests was due
	last       time.Time   // when the last recorded response ended
	errors     int
	firstError string
}

// run serves jobs over one keep-alive connection, opened when first needed
// and again after any failure or a "Connection: close".
func (r *result) run(address string, request []byte, jobs <-chan job, skip int) {
	var conn net.Conn
	var reader *bufio.Reader
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	for j := range jobs {
		if conn == nil {
			var err error
			if conn, err = net.DialTimeout("tcp", address, ioTimeout); err != nil {
				r.fail(err)
				conn = nil
				continue
			}
			reader = bufio.NewReaderSize(conn, 16<<10)
		}
		keep, err := exchange(conn, reader, request)
		now := time.Now()
		if err != nil {
			r.fail(err)
		} else if j.index >= skip {
			r.latencies = append(r.latencies, now.Sub(j.due))
			r.dues = append(r.dues, j.due)
			r.last = now
		}
		if err != nil || !keep {
			conn.Close()
			conn = nil
		}
	}
}

func (r *result) fail(err error) {
	if r.errors == 0 {
		r.firstError = err.Error()
	}
	r.errors++
}

// exchange writes one request and reads its whole response. It reports
// whether the connection may carry another, and an error for anything but
// a 2xx answer: a redirect is not followed, so counting it would time a
// cheap answer instead of the one asked for.
func exchange(conn net.Conn, reader *bufio.Reader, request []byte) (bool, error) {
	conn.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := conn.Write(request); err != nil {
		return false, err
	}
	status, err := reader.ReadString('\n')
	if err != nil {
		return false, err
	}
	fields := strings.Fields(status)
	if len(fields) < 2 || !strings.HasPrefix(fields[0], "HTTP/1.") {
		return false, fmt.Errorf("not an HTTP/1.x status line: %q", status)
	}
	code, err := strconv.Atoi(fields[1])
	if err != nil {
		return false, fmt.Errorf("bad status line: %q", status)
	}
	length, chunked, keep := -1, false, fields[0] == "HTTP/1.1"
	for {
		line, err := reader.ReadString('\n')
		if err != nil {
			return false, err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			break
		}
		name, value, _ := strings.Cut(line, ":")
		value = strings.TrimSpace(value)
		switch strings.ToLower(strings.TrimSpace(name)) {
		case "content-length":
			if length, err = strconv.Atoi(value); err != nil {
				return false, fmt.Errorf("bad Content-Length: %q", value)
			}
		case "transfer-encoding":
			chunked = strings.EqualFold(value, "chunked")
		case "connection":
			keep = !strings.EqualFold(value, "close")
		}
	}
	switch {
	case chunked:
		err = discardChunked(reader)
	case length >= 0:
		_, err = reader.Discard(length)
	default: // the body runs to the end of the connection
		_, err = io.Copy(io.Discard, reader)
		keep = false
	}
	if err != nil {
		return false, err
	}
	if code < 200 || code >= 300 {
		return keep, fmt.Errorf("status %d", code)
	}
	return keep, nil
}

func discardChunked(reader *bufio.Reader) error {
	for {
		line, err := reader.ReadString('\n')
		if err != nil {
			return err
		}
		size, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(line, ";", 2)[0]), 16, 64)
		if err != nil {
			return fmt.Errorf("bad chunk size: %q", line)
		}
		if size == 0 {
			for { // trailers, up to the blank line
				line, err := reader.ReadString('\n')
				if err != nil {
					return err
				}
				if strings.TrimRight(line, "\r\n") == "" {
					return nil
				}
			}
		}
		if _, err := reader.Discard(int(size) + 2); err != nil {
			return err
		}
	}
}
