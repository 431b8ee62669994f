// Command consul is a thin wrapper that builds HashiCorp Consul from the Go
// module proxy.
//
// WHY this file exists: Consul's own go.mod uses `replace` directives for its
// in-repo submodules (api, sdk, proto-public, envoyextensions, troubleshoot),
// so `go install github.com/hashicorp/consul@vX` refuses to build it. A module
// of our own can import Consul's packages instead; its go.mod then pins the
// published submodule versions that Consul's go.mod names (see README.md).
//
// The body below mirrors Consul's top-level main.go at the pinned version
// (github.com/hashicorp/consul@v1.22.5/main.go) as closely as possible, so the
// result behaves like the official `consul` binary. Keep it in sync when the
// pinned version changes.
package main

import (
	"fmt"
	"io"
	"log"
	"os"

	mcli "github.com/mitchellh/cli"

	"github.com/hashicorp/consul/command"
	"github.com/hashicorp/consul/command/cli"
	"github.com/hashicorp/consul/command/version"
	// Registers the OS service hooks (Windows service support); a no-op on
	// Linux, but upstream imports it, so we do too.
	_ "github.com/hashicorp/consul/service_os"
)

func main() {
	os.Exit(realMain())
}

func realMain() int {
	// Upstream silences the std logger: Consul logs through hclog, and some
	// dependencies would otherwise write noise to stderr.
	log.SetOutput(io.Discard)

	ui := &cli.BasicUI{
		BasicUi: mcli.BasicUi{Writer: os.Stdout, ErrorWriter: os.Stderr},
	}
	cmds := command.RegisteredCommands(ui)
	var names []string
	for c := range cmds {
		names = append(names, c)
	}

	cli := &mcli.CLI{
		Args:         os.Args[1:],
		Commands:     cmds,
		Autocomplete: true,
		Name:         "consul",
		HelpFunc:     mcli.FilteredHelpFunc(names, mcli.BasicHelpFunc("consul")),
		HelpWriter:   os.Stdout,
		ErrorWriter:  os.Stderr,
	}

	// `consul -v` / `consul --version` print the same as `consul version`.
	if cli.IsVersion() {
		cmd := version.New(ui)
		return cmd.Run(nil)
	}

	exitCode, err := cli.Run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error executing CLI: %v\n", err)
		return 1
	}

	return exitCode
}
