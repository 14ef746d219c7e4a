"""Where the agent's view of the mesh comes from: the local file or the Kubernetes API.

`kubernetes` is imported only in this package."""
