"""Waypoints: stock Envoy run and configured by the node agent over ADS."""
