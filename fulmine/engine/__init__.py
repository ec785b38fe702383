"""The engine: scheduler, model runner and the step loop that joins them."""
