"""The L7 waypoint: Envoy proxies the node agent configures over xDS."""
