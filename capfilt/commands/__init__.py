"""One module per `capfilt` command; each parses options, builds a typed config and calls pipeline/ or model/."""
