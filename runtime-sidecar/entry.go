package main

// `kt-runtime entry -- COMMAND...` is the user's container's command: the sidecar copied this
// static binary into the pod's shared volume, so any image runs unchanged. It takes the payload
// from the sidecar, runs the command with it on stdin, copies stdout and stderr both to the
// container's own streams (`kubectl logs`) and to the sidecar, forwards a stop to the whole
// process group, and exits with the command's code once the sidecar has recorded it.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

const (
	exitNoSidecar = 125 // as `docker run` when the runtime itself failed
	exitNotFound  = 127
)

type entry struct {
	conn net.Conn
	mu   sync.Mutex // frames from the two streams are written whole, one at a time
}

func (e *entry) send(kind byte, data []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.conn != nil {
		if err := writeFrame(e.conn, kind, data); err != nil {
			e.conn = nil // the sidecar is gone: the process still runs to its end
		}
	}
}

// dial waits for the sidecar's socket: the kubelet starts this container as soon as the
// sidecar's process has started, not when it is listening.
func dial(path string, wait time.Duration) (net.Conn, error) {
	deadline := time.Now().Add(wait)
	for {
		conn, err := net.Dial("unix", path)
		if err == nil || time.Now().After(deadline) {
			return conn, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func runEntry(dir string, argv []string) int {
	if len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "kt-runtime entry: no command")
		return exitNoSidecar
	}
	conn, err := dial(filepath.Join(dir, socketName), 120*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kt-runtime entry: no sidecar: %v\n", err)
		return exitNoSidecar
	}
	defer conn.Close()
	first, err := readFrame(conn)
	if err != nil || first.kind != framePayload {
		fmt.Fprintf(os.Stderr, "kt-runtime entry: no payload from the sidecar: %v\n", err)
		return exitNoSidecar
	}
	e := &entry{conn: conn}
	code := e.run(argv, first.data)
	e.send(frameExit, exitFrame(code))
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := readFrame(conn); err != nil {
		fmt.Fprintf(os.Stderr, "kt-runtime entry: the sidecar did not confirm the exit: %v\n", err)
	}
	return code
}

func (e *entry) run(argv []string, payload []byte) int {
	stops := make(chan os.Signal, 2)
	signal.Notify(stops, syscall.SIGTERM, syscall.SIGINT)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		msg := fmt.Sprintf("kt-runtime: cannot run %q: %v\n", argv[0], err)
		os.Stderr.WriteString(msg)
		e.send(frameStderr, []byte(msg))
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return exitNotFound
		}
		return 126
	}
	go func() {
		_, _ = stdin.Write(payload)
		_ = stdin.Close()
	}()
	var copying sync.WaitGroup
	for _, s := range []struct {
		from io.Reader
		to   *os.File
		kind byte
	}{{stdout, os.Stdout, frameStdout}, {stderr, os.Stderr, frameStderr}} {
		copying.Add(1)
		go func() {
			defer copying.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := s.from.Read(buf)
				if n > 0 {
					_, _ = s.to.Write(buf[:n])
					e.send(s.kind, append([]byte(nil), buf[:n]...))
				}
				if err != nil {
					return
				}
			}
		}()
	}
	stopped := forwardStops(cmd, stops, func() { e.send(frameTerminated, nil) })
	copying.Wait()
	err := cmd.Wait()
	stopped()
	return exitCode(err)
}
