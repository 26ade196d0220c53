package main

// `kt-runtime serve -- COMMAND...` is a warm server container's command (the runtime is put
// into the pod's volume by the proxy sidecar's postStart hook, before this container starts).
// It runs the function's server as a child in its own process group — so the server is not
// the container's PID 1, which ignores a SIGTERM it never handled — passes stop signals on,
// and copies the server's output, line by line, to the container's own streams (`kubectl
// logs`) and to the proxy, which gives each line to the invocations in flight then: their
// tasks' logs.

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

func runServe(dir string, argv []string) int {
	if len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "kt-runtime serve: no command")
		return exitNoSidecar
	}
	stops := make(chan os.Signal, 2) // before anything else: a stop may come at any time
	signal.Notify(stops, syscall.SIGTERM, syscall.SIGINT)
	e := &entry{}
	if conn, err := dial(filepath.Join(dir, proxySocket), 5*time.Second); err == nil {
		e.conn = conn
		defer conn.Close()
	} else {
		fmt.Fprintf(os.Stderr, "kt-runtime serve: no proxy to give output to: %v\n", err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin = os.Stdin
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, _ := cmd.StdoutPipe() // *os.File: its descriptor is asked how much it holds
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "kt-runtime: cannot run %q: %v\n", argv[0], err)
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return exitNotFound
		}
		return 126
	}
	var copying sync.WaitGroup
	streams := []*stream{
		{from: stdout.(*os.File), to: os.Stdout, kind: frameStdout},
		{from: stderr.(*os.File), to: os.Stderr, kind: frameStderr},
	}
	for _, st := range streams {
		copying.Add(1)
		go func() {
			defer copying.Done()
			st.pump(e)
		}()
	}
	if e.conn != nil {
		go answerSyncs(e, streams)
	}
	stopped := forwardStops(cmd, stops, nil)
	copying.Wait()
	err := cmd.Wait()
	stopped()
	return exitCode(err)
}

// stream copies one of the server's output pipes. `read` and `sent` count chunks taken from
// the pipe and passed on, so a sync can tell that nothing is held between the two.
type stream struct {
	from       *os.File
	to         *os.File
	kind       byte
	read, sent atomic.Int64
}

func (s *stream) pump(e *entry) {
	buf := make([]byte, 32<<10)
	for {
		n, err := s.from.Read(buf)
		if n > 0 {
			s.read.Add(1)
			_, _ = s.to.Write(buf[:n])
			e.send(s.kind, append([]byte(nil), buf[:n]...))
			s.sent.Add(1)
		}
		if err != nil {
			return
		}
	}
}

// unread is what the pipe holds that has not been read yet (FIONREAD).
func (s *stream) unread() int {
	var n int32
	raw, err := s.from.SyscallConn()
	if err != nil {
		return 0
	}
	_ = raw.Control(func(fd uintptr) {
		syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&n)))
	})
	return int(n)
}

func (s *stream) settled() bool {
	return s.unread() == 0 && s.read.Load() == s.sent.Load()
}

// answerSyncs answers the proxy's syncs: once all the server wrote before the sync arrived has
// been passed on (the proxy asks when an invocation's answer has come, so that what the server
// printed before answering is that invocation's). Settled twice, 100 µs apart, so a chunk
// between its read and its count is not missed.
func answerSyncs(e *entry, streams []*stream) {
	conn := e.conn
	for {
		f, err := readFrame(conn)
		if err != nil {
			return
		}
		if f.kind != frameSync {
			continue
		}
		go func() {
			for range 500 { // at most 50 ms: a server printing without pause is not waited for
				if all(streams) {
					time.Sleep(100 * time.Microsecond)
					if all(streams) {
						break
					}
				}
				time.Sleep(100 * time.Microsecond)
			}
			e.send(frameSync, f.data)
		}()
	}
}

func all(streams []*stream) bool {
	for _, s := range streams {
		if !s.settled() {
			return false
		}
	}
	return true
}
