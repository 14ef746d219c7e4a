"""tether: sidecarless service-mesh node agent."""
