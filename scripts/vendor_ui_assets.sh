#!/usr/bin/env bash
# Re-fetch the web UI's vendored assets (src/tuneloop/ui/static/vendor/) with `npm pack` at the pinned versions
# and check each file against its sha256 in vendor/SHA256SUMS. Nothing is fetched at run time: the UI works offline.
#
#   scripts/vendor_ui_assets.sh          fetch, check, copy into vendor/ (fails on a hash mismatch, copies nothing)
#   scripts/vendor_ui_assets.sh --check  only check the files already in vendor/ against SHA256SUMS
#
# To move to a new version: change the version in SHA256SUMS, run with UPDATE=1 (prints the new hashes and
# copies the files), review the diff, and commit the files with the new SHA256SUMS.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$here/src/tuneloop/ui/static/vendor"
sums="$vendor/SHA256SUMS"

check_only=0
[[ "${1:-}" == "--check" ]] && check_only=1

# package@version -> path of the file inside the npm tarball
src_path() {
  case "$1:$2" in
    chart.js@*:chart.umd.js) echo "package/dist/chart.umd.js" ;;
    chart.js@*:chart.js.LICENSE.md) echo "package/LICENSE.md" ;;
    *) echo "no source path known for $1 $2 (edit src_path in $0)" >&2; exit 2 ;;
  esac
}

status=0
if (( check_only )); then
  while read -r pkg file sha; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    got="$(sha256sum "$vendor/$file" | cut -d' ' -f1)"
    if [[ "$got" == "$sha" ]]; then echo "ok        $file ($pkg)"; else echo "MISMATCH  $file ($pkg): $got, expected $sha"; status=1; fi
  done < "$sums"
  exit $status
fi

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
declare -A unpacked=()
while read -r pkg file sha; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  if [[ -z "${unpacked[$pkg]:-}" ]]; then
    mkdir -p "$work/$pkg"
    (cd "$work/$pkg" && npm pack --silent "$pkg" >/dev/null && tar xzf ./*.tgz)
    unpacked[$pkg]=1
  fi
  f="$work/$pkg/$(src_path "$pkg" "$file")"
  got="$(sha256sum "$f" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "MISMATCH  $file from $pkg: $got, expected $sha"
    [[ "${UPDATE:-0}" == 1 ]] || { status=1; continue; }
  fi
  echo "ok        $file from $pkg ($got)"
  echo "$f" >> "$work/copy.list"; echo "$vendor/$file" >> "$work/dest.list"
done < "$sums"
if (( status )); then echo "nothing copied: a fetched file does not match SHA256SUMS" >&2; exit 1; fi
paste -d' ' "$work/copy.list" "$work/dest.list" | while read -r from to; do cp "$from" "$to"; done
echo "vendor/ is up to date"
