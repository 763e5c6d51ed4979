"""zbus: a message bus addressed by Id."""
