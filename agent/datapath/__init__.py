"""Kernel datapath: eBPF loading, maps, links and pins."""
