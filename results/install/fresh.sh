#!/usr/bin/env bash
# the whole check from nothing: phase 1 (a torch pair), phase 2 (the project), phase 3 (compare + tests)
name=$1 torch=$2 audio=$3 target=$4 mode=$5
rm -rf /tmp/venv-$name
./phase1.sh $name "$torch" "$audio" 2>&1 | grep -v "^WARNING: Location"
./phase2.sh $name "$target" 2>&1
./phase3.sh $name $mode 2>&1
