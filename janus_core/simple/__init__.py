"""One request at a time, without the pool: the plain paths the engine is checked against."""
