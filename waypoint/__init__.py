"""The L7 waypoint: stock Envoy proxies the node agent runs and configures over
ADS (`envoy`, `xds`, `sds`, `peer`), and the pure translation of the mesh
state and users' documents into Envoy resources (`translate`)."""
