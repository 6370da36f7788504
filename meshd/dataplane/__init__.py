"""What every role's data path shares, below the roles and above the mesh services: the state a
node's proxies read (`state`), the byte pump (`pump`), and how one proxied connection is refused
or carried with its telemetry (`proxied`)."""
