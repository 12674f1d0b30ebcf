"""`janus-server batch`: an OpenAI batch input file (JSONL) in, OpenAI's batch output file out.

Each input line, `{"custom_id", "method": "POST", "url", "body"}`, is POSTed to one of four routes
(`ROUTES`) and answered by one output line, `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}`, whatever the status (OpenAI records per-request HTTP errors that way too); a line
that cannot be sent (not JSON, no custom_id, another method or route, a custom_id seen on an earlier line)
gets `"response": null` and an `error` naming the problem, and the file goes on. Each output line is one
write, so the file is valid JSONL at any moment; a partial last line left by a hard kill is cut off on the
next run, which skips the lines already answered (resume). Ctrl+C stops sending: the requests in flight
finish and are written (twice: they are abandoned).

Where the requests go is the caller's choice: a running server (`--url`, plain HTTP with retries and an
Idempotency-Key per line, so a retry after a dropped connection joins the first job), or the same app
`janus-server serve` builds, with the in-process queue and one in-process worker, called through
`httpx.ASGITransport` (`--model`): no port, the same routes and answers. This package knows the batch
formats, resuming, image files and retries; it knows nothing of the model, and imports neither torch nor
the app on the --url path (the api-only install runs it).

- `files`: the input lines (`parse_line`), the output file and its records, resuming, image files.
- `send`: one request sent with retries (`send`, `RetryPolicy`, `Backoff`), the `--url` client.
- `command`: the run (`main`, `Plan`, `Run`, `Interrupts`, the progress bar, the in-process app).
"""
