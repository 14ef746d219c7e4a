"""Simulated Kubernetes nodes and pods (netns + cgroups) for the demo and the tests."""
