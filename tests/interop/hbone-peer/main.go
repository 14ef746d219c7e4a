// hbone-peer: Istio's own HBONE code (istio.io/istio/pkg/hbone, the Go
// dialer and server Istio's test workloads use against ztunnel) driven from
// tether's interop tests, so tether's 15008 is checked against a peer that
// tether's authors did not write.
//
//	hbone-peer dial  --proxy IP:15008 --target IP:PORT --cert F --key F --ca F --expect-id ID --send TEXT [--linger]
//	hbone-peer serve --listen IP:15008 --cert F --key F --ca F --trust-domain TD
//
// serve shuts down gracefully on SIGUSR1 (http.Server.Shutdown: Go's HTTP/2
// server sends GOAWAY(NO_ERROR) and lets open streams finish), printing
// "draining" and then "drained" once the last stream ended.
//
// dial: one CONNECT through the proxy with mutual TLS; reads the echo
// server's greeting line, sends TEXT and a newline, reads the echo; prints
// one JSON line.  serve: Istio's HBONE server behind mutual TLS; logs one
// line per CONNECT with the client's SPIFFE ID.  Certificates are SPIFFE
// SVIDs: the peer's chain is verified against --ca and its URI SAN checked
// (no DNS or IP SAN is expected, as between ztunnels).
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"istio.io/istio/pkg/hbone"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hbone-peer: "+format+"\n", args...)
	os.Exit(1)
}

func pool(caFile string) *x509.CertPool {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		fail("read CA: %v", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(pem) {
		fail("no certificate in %s", caFile)
	}
	return p
}

// verifySpiffe checks the chain against roots (any name) and returns the
// leaf's single spiffe:// URI SAN.
func verifySpiffe(raw [][]byte, roots *x509.CertPool, usage x509.ExtKeyUsage) (string, error) {
	if len(raw) == 0 {
		return "", errors.New("no certificate")
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return "", err
		}
		certs = append(certs, c)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage},
	}); err != nil {
		return "", err
	}
	var ids []string
	for _, u := range certs[0].URIs {
		if u.Scheme == "spiffe" {
			ids = append(ids, u.String())
		}
	}
	if len(ids) != 1 {
		return "", fmt.Errorf("want one spiffe URI SAN, got %v", ids)
	}
	return ids[0], nil
}

func keyPair(cert, key string) tls.Certificate {
	kp, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		fail("load key pair: %v", err)
	}
	return kp
}

func dial(args []string) {
	fs := flag.NewFlagSet("dial", flag.ExitOnError)
	proxy := fs.String("proxy", "", "HBONE server IP:15008")
	target := fs.String("target", "", "destination IP:PORT (the CONNECT authority)")
	cert, key, ca := fs.String("cert", "", ""), fs.String("key", "", ""), fs.String("ca", "", "")
	expect := fs.String("expect-id", "", "the server's SPIFFE ID")
	send := fs.String("send", "hello from istio's hbone dialer", "")
	linger := fs.Bool("linger", false, "after the exchange, stay until stdin closes: "+
		"the dialer ends its stream in a goroutine, and exiting at once would tear "+
		"the HTTP/2 connection down under it")
	_ = fs.Parse(args)
	roots := pool(*ca)
	seen := ""
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{keyPair(*cert, *key)},
		// Names are SPIFFE IDs, not hostnames: verify the chain and the ID here.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := verifySpiffe(raw, roots, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			if *expect != "" && id != *expect {
				return fmt.Errorf("server is %s, expected %s", id, *expect)
			}
			seen = id
			return nil
		},
	}
	d := hbone.NewDialer(hbone.Config{ProxyAddress: *proxy, TLS: cfg})
	conn, err := d.Dial("tcp", *target)
	if err != nil {
		fail("dial %s via %s: %v", *target, *proxy, err)
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	hello, err := r.ReadString('\n')
	if err != nil {
		fail("read greeting: %v", err)
	}
	if _, err := conn.Write([]byte(*send + "\n")); err != nil {
		fail("write: %v", err)
	}
	echo, err := r.ReadString('\n')
	if err != nil {
		fail("read echo: %v", err)
	}
	out, _ := json.Marshal(map[string]any{
		"ok": true, "server_id": seen,
		"greeting": json.RawMessage(strings.TrimSpace(hello)),
		"echo":     strings.TrimSuffix(echo, "\n"),
	})
	fmt.Println(string(out))
	conn.Close()
	if *linger {
		_, _ = io.Copy(io.Discard, os.Stdin)
	}
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := fs.String("listen", "", "IP:15008")
	cert, key, ca := fs.String("cert", "", ""), fs.String("key", "", ""), fs.String("ca", "", "")
	td := fs.String("trust-domain", "cluster.local", "")
	_ = fs.Parse(args)
	roots := pool(*ca)
	srv := hbone.NewServer()
	// Istio's NewServer enables HTTP/1 and cleartext HTTP/2 (its test workloads'
	// plaintext HBONE port); 15008 is HTTP/2 over TLS, so add that protocol.
	if srv.Protocols == nil {
		srv.Protocols = new(http.Protocols)
	}
	srv.Protocols.SetHTTP2(true)
	inner := srv.Handler
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := "-"
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			for _, u := range r.TLS.PeerCertificates[0].URIs {
				id = u.String()
			}
		}
		fmt.Printf("CONNECT %s %s from %s (%s)\n", r.Proto, r.Host, id, r.RemoteAddr)
		inner.ServeHTTP(w, r)
	})
	srv.TLSConfig = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{keyPair(*cert, *key)},
		NextProtos:   []string{"h2"},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := verifySpiffe(raw, roots, x509.ExtKeyUsageClientAuth)
			if err != nil {
				return err
			}
			if !strings.HasPrefix(id, "spiffe://"+*td+"/") {
				return fmt.Errorf("client %s is not in trust domain %s", id, *td)
			}
			return nil
		},
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fail("listen %s: %v", *listen, err)
	}
	drained := make(chan struct{})
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go func() {
		<-usr1
		fmt.Println("draining")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := srv.Shutdown(ctx)
		fmt.Printf("drained %v\n", err)
		close(drained)
	}()
	fmt.Println("ready")
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fail("serve: %v", err)
	}
	<-drained
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: hbone-peer dial|serve [flags]")
	}
	switch os.Args[1] {
	case "dial":
		dial(os.Args[2:])
	case "serve":
		serve(os.Args[2:])
	default:
		fail("unknown mode %q", os.Args[1])
	}
}
