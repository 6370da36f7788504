"""The gateway role (`meshd role=gateway`): a network's east-west gateway for double HBONE."""
