"""What server and clients agree on: the protocol, the schedule, folding, reply checks, stopping."""
