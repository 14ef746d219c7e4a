"""The node's shared tunnel: per-pod listeners (pod), outbound (outbound),
inbound HBONE (inbound), inbound plaintext (plaintext), same-node and
inbound delivery (delivery), HBONE and its HTTP/2 (hbone, h2conn), relays
(relay, bridge), open-connection bookkeeping (conns) and the policy re-check
of open connections (watcher)."""
