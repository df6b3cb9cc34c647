"""Kept for older imports: the client lives in `charter.client` (`charter.Client`)."""

from charter.client import TERMINAL, Client, ClientError, Files, Job, Jobs, format_detail

__all__ = ["TERMINAL", "Client", "ClientError", "Files", "Job", "Jobs", "format_detail"]
