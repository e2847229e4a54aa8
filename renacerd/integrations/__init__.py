"""Ready callbacks for training frameworks; each module imports its framework on its own."""
