-- wrk script for benchmarks/serve.py: POST one JSON body on every request.
--   wrk -s benchmarks/wrk_post.lua <url> -- <body.json> [<bearer token>]
-- The body is read once per wrk thread in init(); wrk then sends the same pre-built request
-- (no per-request Lua), so the script costs the load generator nothing while it runs.

function init(args)
  local file = assert(io.open(args[1], "rb"), "cannot open body file " .. tostring(args[1]))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[2] and args[2] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[2]
  end
end
