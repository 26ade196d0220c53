// kt-runtime is kubetask's agent in executor pods: `sidecar` runs beside the function's
// container, `entry` is that container's command. One static binary, so it runs in any image.
package main

import (
	"fmt"
	"os"
)

func main() {
	dir := os.Getenv("KUBETASK_RUNTIME_DIR")
	if dir == "" {
		dir = "/kt"
	}
	if len(os.Args) >= 2 {
		switch os.Args[1] {
		case "sidecar":
			os.Exit(runSidecar(dir))
		case "entry":
			argv := os.Args[2:]
			if len(argv) > 0 && argv[0] == "--" {
				argv = argv[1:]
			}
			os.Exit(runEntry(dir, argv))
		}
	}
	fmt.Fprintln(os.Stderr, "usage: kt-runtime sidecar | kt-runtime entry -- COMMAND [ARG...]")
	os.Exit(2)
}
