# -- on-cluster captioning (vidcap job submit --caption): vidcap caption against this job's own server --
# Rendered by vidcap.oncluster.script(); inserted into vllm.sbatch once the servers are ready.
CAPTION_SRC={{src}}
CAPTION_OUT={{out}}
printf '%s\n' {{config}} >"$JOB_DIR/caption.json"
CAPTION_DIR=$(CDPATH='' cd -- "$CAPTION_SRC" && pwd -P) || { say "caption path $CAPTION_SRC is not a directory here"; exit 2; }
case "$CAPTION_DIR/" in
    "$VIDEOS_DIR"/*) ;;
    *) say "caption path $CAPTION_DIR is not under videos_dir $VIDEOS_DIR, the only directory the model server reads"; exit 2 ;;
esac
mkdir -p -- "$CAPTION_OUT"
# Through the guard, like any client: it passes GET /health, GET /version and /v1/, all that `vidcap caption`
# uses; the model server itself listens only on its private unix socket.
CAPTION=(caption "$CAPTION_DIR" --config "$JOB_DIR/caption.json" --out "$CAPTION_OUT"
    --server "http://127.0.0.1:$GUARD_PORT/v1" --model "$SERVED_NAME"{{shard}})
VIDCAP_API_KEY=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["api_key"])' "$JOB_DIR/secrets.json")
VIDCAP_JOB_KEY=$JOB_KEY  # names the run summaries after this task: `vidcap job status` reads them
export VIDCAP_API_KEY VIDCAP_JOB_KEY
say "captioning $CAPTION_DIR{{shard_note}} into $CAPTION_OUT"
# In the background and waited for: a TERM (scancel, the local executor's cancel) interrupts `wait` at
# once, and the cleanup stops the run, which writes its summary before it exits.
"${VIDCAP[@]}" "${CAPTION[@]}" </dev/null &
CAPTION_PID=$!
rc=0
wait "$CAPTION_PID" || rc=$?
CAPTION_PID=''
say "captioning ended with status $rc"
{{ending}}
