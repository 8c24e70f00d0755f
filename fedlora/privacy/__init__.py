"""Privacy: DP-SGD's mechanisms, the accountants, user-level DP on the server."""
