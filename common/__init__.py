"""Infrastructure both processes use: settings, logging, object store, broker topology."""
