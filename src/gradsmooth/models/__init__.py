"""Model builders shared by the task runners."""
