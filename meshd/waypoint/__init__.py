"""The waypoint role: L7 routing (`router`), the HTTP-over-HBONE proxy (`proxy`), hairpin claims (`hairpin`)."""
