#!/bin/sh
# The compose `trainer` service: make sure MNIST is there, then train unless a model already is.
#
#   sh docker/train-if-needed.sh --out /models [more mnist-train flags]
#
# Environment:
#   MNIST_DATA_DIR      the MNIST folder that training and the load test read (compose: /data/mnist,
#                       the host's $MNIST_DATA_DIR mounted read-only, else the `mnist` volume)
#   MNIST_DOWNLOAD_DIR  a writable folder to download MNIST into when MNIST_DATA_DIR has no files
#                       (compose: the `mnist` volume, which is MNIST_DATA_DIR itself in that case)
#   RETRAIN=1           train and publish a new model version even if one exists
#   TRAIN_ARGS          extra mnist-train flags, split on spaces (e.g. "--recipe best")
set -eu

say() { echo "[train-if-needed] $*" >&2; }
has_mnist() { [ -f "$1/train-images-idx3-ubyte.gz" ] || [ -f "$1/train-images-idx3-ubyte" ]; }

set -f                              # TRAIN_ARGS is split into words, never globbed
set -- "$@" ${TRAIN_ARGS:-}
set +f

if [ -n "${MNIST_DATA_DIR:-}" ] && ! has_mnist "$MNIST_DATA_DIR"; then
  if [ -z "${MNIST_DOWNLOAD_DIR:-}" ]; then
    say "no MNIST files in $MNIST_DATA_DIR"; exit 2
  fi
  say "no MNIST files in $MNIST_DATA_DIR: downloading MNIST into $MNIST_DOWNLOAD_DIR"
  python "$(dirname "$0")/fetch_mnist.py" "$MNIST_DOWNLOAD_DIR"
  if ! has_mnist "$MNIST_DATA_DIR"; then
    say "$MNIST_DATA_DIR still has no MNIST files: the host's MNIST_DATA_DIR names a folder without" \
        "the four IDX files; fix it, or unset it to use the download"
    exit 2
  fi
fi

out=model_repository model=mnist prev=
for arg in "$@"; do
  case $prev in --out) out=$arg ;; --model-name) model=$arg ;; esac
  case $arg in --out=*) out=${arg#*=} ;; --model-name=*) model=${arg#*=} ;; esac
  prev=$arg
done

case ${RETRAIN:-0} in
  1 | true | TRUE | True | yes) ;;
  *)
    for model_file in "$out/$model"/*/model.onnx; do
      if [ -f "$model_file" ]; then
        say "reusing $model_file; set RETRAIN=1 to train a new version"
        exit 0
      fi
    done ;;
esac

say "training: mnist-train $*"
exec mnist-train "$@"
