// Command compose-check validates a Compose file offline, the same way
// `docker compose config` does, without needing a Docker engine or the
// compose CLI plugin (neither is available in CI or on dev machines here).
//
// It uses github.com/compose-spec/compose-go/v2, the library docker compose
// itself is built on, so the file is checked against the compose-spec JSON
// schema (unknown keys, wrong types, ...) and then for consistency
// (depends_on targets exist, named volumes/networks are declared, ...).
//
// On success it prints the service names, one per line, sorted, and exits 0.
// On failure it prints the loader's error to stderr and exits 1. With
// -strict, loader warnings (obsolete `version:` key, unset variables
// interpolated as blanks, ...) also make it exit 1.
//
// Usage:
//
//	compose-check [-strict] [-project-directory DIR] [-env KEY=VALUE ...] [FILE ...]
//
// FILE defaults to compose.yml; "-" reads the file from stdin. Paths inside
// the file (build contexts, bind mounts) are resolved against
// -project-directory, which defaults to the directory of the first FILE.
// The process environment and any .env file are deliberately ignored so the
// result is reproducible; pass -env to set interpolation variables.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/sirupsen/logrus"
)

// warningCounter is a logrus hook: compose-go reports non-fatal problems
// (obsolete attributes, unset variables, ...) as logrus warnings.
type warningCounter struct{ n int }

func (w *warningCounter) Levels() []logrus.Level {
	return []logrus.Level{logrus.WarnLevel}
}

func (w *warningCounter) Fire(*logrus.Entry) error {
	w.n++
	return nil
}

type envFlags []string

func (e *envFlags) String() string { return strings.Join(*e, ",") }

func (e *envFlags) Set(v string) error {
	if !strings.Contains(v, "=") {
		return fmt.Errorf("expected KEY=VALUE, got %q", v)
	}
	*e = append(*e, v)
	return nil
}

func main() {
	os.Exit(run())
}

func run() int {
	var (
		projectDir string
		env        envFlags
		strict     bool
	)
	flag.BoolVar(&strict, "strict", false, "treat loader warnings as errors")
	flag.StringVar(&projectDir, "project-directory", "", "directory relative paths are resolved against (default: directory of the first file)")
	flag.Var(&env, "env", "KEY=VALUE interpolation variable (repeatable)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [flags] [compose-file ...]\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()

	files := flag.Args()
	if len(files) == 0 {
		files = []string{"compose.yml"}
	}

	warnings := &warningCounter{}
	logrus.AddHook(warnings)

	opts, err := cli.NewProjectOptions(
		files,
		cli.WithWorkingDirectory(projectDir),
		cli.WithEnv(env),
		// Validate every service, including ones hidden behind profiles.
		cli.WithProfiles([]string{"*"}),
		cli.WithResolvedPaths(true),
		cli.WithInterpolation(true),
		cli.WithNormalization(true),
		cli.WithConsistency(true),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "compose-check: %v\n", err)
		return 2
	}

	// LoadProject runs schema validation unless loader.WithSkipValidation
	// is passed, which we never do.
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintf(os.Stderr, "compose-check: invalid compose file %s: %v\n", strings.Join(files, ", "), err)
		return 1
	}

	if strict && warnings.n > 0 {
		fmt.Fprintf(os.Stderr, "compose-check: %d warning(s) while loading %s (-strict)\n", warnings.n, strings.Join(files, ", "))
		return 1
	}

	names := project.ServiceNames()
	sort.Strings(names)
	for _, n := range names {
		fmt.Println(n)
	}
	return 0
}
