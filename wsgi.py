"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`."""

from textgen import create_app

app = create_app()
