"""What runs inside gunicorn besides the app: its worker class and its hooks (no torch here:
the master imports this module before it forks)."""
