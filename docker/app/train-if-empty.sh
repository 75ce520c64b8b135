#!/bin/sh
# Compose's one-shot `trainer`: publish a first version when the model repository has none.
#
#   train-if-empty REPO MODEL [train-and-publish flags...]
#
# A version exists once its manifest.json does (the publish commit point, README "Model
# repository"), so a half-finished publish from an interrupted run counts as empty and is
# redone. Training a newer version later is an explicit act:
#   docker compose run --rm trainer python -m training train-and-publish --repo REPO ...
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: train-if-empty REPO MODEL [train-and-publish flags...]" >&2
    exit 2
fi
repo=$1
model=$2
shift 2

for manifest in "$repo/$model"/*/manifest.json; do
    if [ -f "$manifest" ]; then
        echo "trainer: $repo already holds a published version of $model ($manifest); nothing to do"
        exit 0
    fi
done

echo "trainer: no published version of $model in $repo; training one"
exec python -m training train-and-publish --repo "$repo" --model-name "$model" "$@"
