package main

// The one wire format of the runtime, between the entry and the sidecar (a Unix socket in the
// pod's shared volume) and between the sidecar and the dispatcher (HTTP bodies): frames of one
// kind byte, a big-endian 32-bit length and that many bytes. Output stays binary-safe and in
// the order the process wrote it, across its two streams.

import (
	"encoding/binary"
	"errors"
	"io"
)

const (
	framePayload    byte = 'P' // sidecar -> entry: the task's payload, for the process's stdin
	frameRunning    byte = 'R' // sidecar -> dispatcher: the function's container has started
	frameStdout     byte = 'O' // the process's stdout (the result)
	frameStderr     byte = 'E' // the process's stderr (its log)
	frameTerminated byte = 'T' // the container was told to stop (pod deleted or evicted)
	frameExit       byte = 'X' // the exit code, as 4 bytes; ends the attempt
	frameAck        byte = 'A' // sidecar -> entry: the exit is recorded
	frameAnswer     byte = 'H' // proxy -> dispatcher: the server's status (4 bytes) and body
	frameSync       byte = 'S' // proxy <-> serve: everything the server wrote so far is sent
	maxFrame             = 1 << 24
)

type frame struct {
	kind byte
	data []byte
}

func writeFrame(w io.Writer, kind byte, data []byte) error {
	head := make([]byte, 5, 5+len(data))
	head[0] = kind
	binary.BigEndian.PutUint32(head[1:], uint32(len(data)))
	_, err := w.Write(append(head, data...))
	return err
}

func readFrame(r io.Reader) (frame, error) {
	var head [5]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return frame{}, err
	}
	n := binary.BigEndian.Uint32(head[1:])
	if n > maxFrame {
		return frame{}, errors.New("frame too large")
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return frame{}, err
	}
	return frame{head[0], data}, nil
}

func exitFrame(code int) []byte {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(int32(code)))
	return b[:]
}
