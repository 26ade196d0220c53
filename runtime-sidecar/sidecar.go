package main

// `kt-runtime sidecar` is the native sidecar of a Job-per-task pod. It holds the attempt's one
// credential — a token the dispatcher made for this attempt alone, in this container's
// environment only — and no NATS credentials at all: it can fetch this attempt's payload and
// report this attempt's output and exit, nothing of any other task or account.
//
// It fetches the payload and hands it to the entry (put into the shared volume by its own
// postStart hook, `kt-runtime install`) over a Unix socket there, and forwards what the entry sends (output frames, then the exit)
// to the dispatcher in batches, with a heartbeat while the process is quiet.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

const (
	socketName = "runtime.sock"
	flushEvery = 50 * time.Millisecond
	flushBytes = 256 << 10
	// The most output held for the dispatcher: past it the entry's socket is not read, so the
	// function's own writes wait. The dispatcher holds its answers to read an account's output
	// at its pace (`dispatch/log_pacing.py`), and refuses a request past 4 MiB; what piled up
	// unbounded meanwhile went in one request, was refused, and the attempt was lost.
	holdBytes = 1 << 20
	beatEvery = 5 * time.Second
	retryFor  = 60 * time.Second // a dispatcher briefly unreachable is waited for this long
)

// errAbandoned: the dispatcher no longer knows the attempt (stopped, timed out, or the
// dispatcher that ran it is gone); whatever runs is not reported any more.
var errAbandoned = errors.New("the dispatcher abandoned this attempt")

type reporter struct {
	url, token string
	client     *http.Client
	session    string // this process's, so a restarted sidecar's requests are not taken for retries
	seq        int
}

// post sends one request, again on a transport error or a 5xx, with the same sequence number,
// so the dispatcher applies it once.
func (r *reporter) post(path string, body []byte) ([]byte, error) {
	r.seq++
	deadline := time.Now().Add(retryFor)
	pause := 50 * time.Millisecond
	for {
		req, _ := http.NewRequest(http.MethodPost, r.url+path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+r.token)
		req.Header.Set("X-Kubetask-Seq", r.session+"-"+strconv.Itoa(r.seq))
		resp, err := r.client.Do(req)
		if err == nil {
			answer, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch {
			case resp.StatusCode < 300:
				return answer, nil
			case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
				return nil, errAbandoned
			case resp.StatusCode < 500:
				return nil, fmt.Errorf("dispatcher refused %s: %d %s", path, resp.StatusCode, answer)
			}
			err = fmt.Errorf("dispatcher answered %d", resp.StatusCode)
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(pause)
		pause = min(pause*2, 2*time.Second)
	}
}

// install copies this binary where the function's container finds it: the sidecar's postStart
// hook, which the kubelet completes before it starts the next container (a copy by the
// sidecar's process could race the function's container, which the kubelet starts once the
// sidecar's process has started).
func install(dir string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	src, err := os.Open(self)
	if err != nil {
		return err
	}
	defer src.Close()
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		return err
	}
	tmp := filepath.Join(dir, "bin", ".kt-runtime")
	dst, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	if err := dst.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "bin", "kt-runtime"))
}

func runSidecar(dir string) int {
	r := &reporter{
		url:     os.Getenv("KUBETASK_RUNTIME_URL"),
		token:   os.Getenv("KUBETASK_RUNTIME_TOKEN"),
		client:  &http.Client{Timeout: 30 * time.Second},
		session: strconv.FormatInt(time.Now().UnixNano(), 36),
	}
	if r.url == "" || r.token == "" {
		log.Print("KUBETASK_RUNTIME_URL and KUBETASK_RUNTIME_TOKEN are required")
		return 2
	}
	sock := filepath.Join(dir, socketName)
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		log.Printf("cannot listen on %s: %v", sock, err)
		return 1
	}
	_ = os.Chmod(sock, 0o666) // the function's container may run as any user
	where, _ := json.Marshal(map[string]string{
		"pod":       os.Getenv("KUBETASK_POD_NAME"),
		"namespace": os.Getenv("KUBETASK_POD_NAMESPACE"),
		"node":      os.Getenv("KUBETASK_NODE_NAME"),
	})
	payload, err := r.post("/v1/run/start", where)
	if err != nil {
		log.Printf("no payload: %v", err)
		return 1
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		if conn, err := ln.Accept(); err == nil {
			accepted <- conn
		}
	}()
	stops := make(chan os.Signal, 1)
	signal.Notify(stops, syscall.SIGTERM, syscall.SIGINT)
	var conn net.Conn
	select {
	case conn = <-accepted:
	case <-stops: // the pod goes before its function ever started
		return 0
	}
	signal.Ignore(syscall.SIGTERM, syscall.SIGINT) // the entry's exit is still to be reported
	defer conn.Close()
	if err := writeFrame(conn, framePayload, payload); err != nil {
		log.Printf("cannot hand the payload over: %v", err)
		return 1
	}
	if err := forward(r, conn); err != nil {
		log.Printf("reporting stopped: %v", err)
	}
	_ = writeFrame(conn, frameAck, nil)
	return 0
}

// forward relays the entry's frames to the dispatcher until the exit frame has been delivered.
// A request carries at most holdBytes and one frame of at most flushBytes.
func forward(r *reporter, conn net.Conn) error {
	var (
		mu      sync.Mutex
		pending bytes.Buffer
		ended   bool
	)
	room := sync.NewCond(&mu)
	_ = writeFrame(&pending, frameRunning, nil)
	wake := make(chan struct{}, 1)
	read := make(chan error, 1)
	go func() {
		for {
			f, err := readFrame(conn)
			if err != nil {
				read <- err
				return
			}
			mu.Lock()
			for data := f.data; ; {
				for pending.Len() >= holdBytes {
					room.Wait()
				}
				n := min(len(data), flushBytes) // output may be cut anywhere; nothing else is this long
				_ = writeFrame(&pending, f.kind, data[:n])
				if data = data[n:]; len(data) == 0 {
					break
				}
			}
			full := pending.Len() >= flushBytes
			mu.Unlock()
			if f.kind == frameExit {
				read <- nil
				return
			}
			if full {
				select {
				case wake <- struct{}{}:
				default:
				}
			}
		}
	}()
	tick := time.NewTicker(flushEvery)
	defer tick.Stop()
	quiet := time.Now()
	var failed, lost error // the entry's end without an exit; the dispatcher's
	for {
		select {
		case err := <-read:
			ended = true
			if err != nil && failed == nil {
				failed = fmt.Errorf("the entry went away without an exit: %v", err)
				mu.Lock()
				_ = writeFrame(&pending, frameStderr, []byte("kt-runtime: "+failed.Error()+"\n"))
				_ = writeFrame(&pending, frameExit, exitFrame(exitNoSidecar))
				mu.Unlock()
			}
		case <-tick.C:
		case <-wake:
		}
		mu.Lock()
		body := append([]byte(nil), pending.Bytes()...)
		pending.Reset()
		room.Signal()
		mu.Unlock()
		// Once the dispatcher is lost, the entry is still drained to its end: this container
		// exiting early would only be restarted by the kubelet.
		if lost == nil && (len(body) > 0 || time.Since(quiet) >= beatEvery) {
			_, lost = r.post("/v1/run/frames", body)
			quiet = time.Now()
		}
		if ended {
			return errors.Join(lost, failed)
		}
	}
}
