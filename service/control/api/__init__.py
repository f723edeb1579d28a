"""The control API's edge: the gRPC servicer, the message translation, the client and the CLI's text."""
