"""The waypoint role: L7 routing (`router`, pure) and, later, the HTTP-over-HBONE proxy."""
