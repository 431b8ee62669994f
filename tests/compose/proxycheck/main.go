// proxycheck prints, for each URL read from stdin (one a line), the proxy
// that Go's net/http would send a request for it through, or DIRECT.
//
// It asks http.ProxyFromEnvironment, which Consul's HTTP checks use (their
// transport is go-cleanhttp's, whose Proxy is that function), so that
// tests/compose/test_compose_proxies.py can hold compose.yml's environment
// for Consul to the rules Consul really follows: NO_PROXY before no_proxy,
// CIDR ranges, loopback always direct.
package main

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
)

func main() {
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		request, err := http.NewRequest(http.MethodGet, lines.Text(), nil)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		proxy, err := http.ProxyFromEnvironment(request)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		if proxy == nil {
			fmt.Printf("%s\tDIRECT\n", request.URL)
		} else {
			fmt.Printf("%s\t%s\n", request.URL, proxy)
		}
	}
	if err := lines.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
