"""C sources of tether's eBPF programs, shipped as package data (agent.bpf)."""
