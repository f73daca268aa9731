#!/usr/bin/env bash
# Builds every image critest v1.34 pulls, from Debian packages, without a registry or network
# (except `apt-get download busybox` the first time, cached in $PEAPOD_DEB_CACHE).
#
#   cri-tests/make-images.sh OUT_DIR
#
# Writes OUT_DIR/images.tar, one OCI image layout holding all the images, each manifest named
# (org.opencontainers.image.ref.name) by the reference critest uses, so that
# `ctr images import --no-unpack` creates them all; and OUT_DIR/images.txt, those references one
# a line. run.sh pushes them to its loopback registry and points containerd's mirrors for
# registry.k8s.io and gcr.io at it.
#
# What critest needs of each (cri-tools pkg/validate and images/):
#   e2e-test-images/busybox:1.29-2   the default image: a shell and the applets the tests run
#                                    (id, ping, brctl, netstat, ipcs, pgrep, top, ...); passwd and
#                                    group like busybox's (nobody, www-data, users)
#   e2e-test-images/nginx:1.14-2     HTTP 200 on :80; a process "nginx" whose cmdline says
#                                    "master process"; /var/run/nginx.pid
#   k8s-staging-cri-tools/hostnet-nginx-amd64   the same on :12003
#   e2e-test-images/httpd:2.4.39-4   HTTP 200 on :80, "httpd" in its log
#   e2e-test-images/nonewprivs:1.3   setuid-root program printing "Effective uid: N"
#   k8s-staging-cri-tools/test-image-user-*     USER 1002 / www-data / 1003:users / www-data:users
#   k8s-staging-cri-tools/test-image-predefined-group   default-user (1000) in group 50000, USER 1000
#   k8s-staging-cri-tools/test-image-{latest,tag:test,tag:all,1,2,3}   distinct images
#   k8s-staging-cri-tools/test-image-tags:{1,2,3}      one image under three tags
#   pause:3.10.1                     the pod sandbox image (containerd's default)
# Not built: test-image-digest@sha256:9700f9…, whose content is fixed by its digest (run.sh
# skips that test).
#
# The shell is Debian's dynamically linked `busybox` (not busybox-static): busybox-static runs
# its applets itself instead of exec'ing /bin/<name> (FEATURE_SH_STANDALONE), so critest's
# MaskedPaths test (mask /bin/ls, expect "/bin/sh: ls: Permission denied") could not pass.
# Applets are hard links, as in the busybox image (a masked symlink would mask busybox itself).
set -euo pipefail
out=${1:?usage: make-images.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------- inputs

busybox_deb() { "$here/../scripts/cached-deb.sh" busybox; }

copy_libs() { "$here/../scripts/copy-libs.sh" "$@"; }

mkdir -p "$work/bin"
for p in pause nnp nginx; do
  gcc -static -O2 -Wall -Wextra -o "$work/bin/$p" "$here/images/$p.c"
done
dpkg-deb -x "$(busybox_deb)" "$work/busybox-deb"
bb=$work/busybox-deb/bin/busybox
[[ -x $bb ]] || { echo "make-images: no busybox in the busybox package" >&2; exit 1; }

# ---------------------------------------------------------------- layers

# layer NAME DIR: a reproducible uncompressed tar of DIR in the OCI blob dir; sets LAYER_DIGEST.
blobs=$work/oci/blobs/sha256
mkdir -p "$blobs"
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
declare -A LAYER=() LAYER_SIZE=()
layer() {
  local name=$1 dir=$2 d
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$dir" -cf "$work/$name.tar" .
  d=$(sha "$work/$name.tar")
  mv "$work/$name.tar" "$blobs/$d"
  LAYER[$name]=$d
  LAYER_SIZE[$name]=$(size "$blobs/$d")
}

# The busybox root: applets at busybox's own paths (--list-full), as hard links.
r=$work/busybox
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,dev,proc,sys,root,home,run,var/spool/mail,var/www}
mkdir -m 1777 "$r/tmp"
ln -s ../run "$r/var/run"
cp "$bb" "$r/bin/busybox"
copy_libs "$r" "$bb"
while read -r applet; do
  [[ $applet == bin/busybox || -e $r/$applet ]] && continue
  mkdir -p "$r/$(dirname "$applet")"
  ln "$r/bin/busybox" "$r/$applet"
done < <("$bb" --list-full)
# Applets busybox's image has and Debian's build lacks: ipcs from util-linux, pgrep (critest
# runs `pgrep sleep || true` and wants an empty stderr) as a small script.
cp /usr/bin/ipcs "$r/usr/bin/ipcs"
copy_libs "$r" /usr/bin/ipcs
cat > "$r/usr/bin/pgrep" <<'EOF'
#!/bin/sh
# pgrep NAME: the pids of the processes named NAME (a stand-in for busybox's pgrep).
rc=1
for d in /proc/[0-9]*; do
  [ "$(cat "$d/comm" 2>/dev/null)" = "$1" ] && { echo "${d#/proc/}"; rc=0; }
done
exit $rc
EOF
chmod 755 "$r/usr/bin/pgrep"
cat > "$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
EOF
cat > "$r/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nogroup:x:65534:
EOF
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$r/etc/nsswitch.conf"
layer busybox "$r"

# nginx stand-in (nginx.c) with its page.
mkdir -p "$work/nginx/usr/sbin" "$work/nginx/usr/share/nginx/html"
cp "$work/bin/nginx" "$work/nginx/usr/sbin/nginx"
echo '<html><body><h1>Welcome to nginx!</h1></body></html>' > "$work/nginx/usr/share/nginx/html/index.html"
layer nginx "$work/nginx"

# httpd: busybox httpd in the foreground, saying "httpd" in the log first.
mkdir -p "$work/httpd/usr/local/bin" "$work/httpd/usr/local/apache2/htdocs"
cat > "$work/httpd/usr/local/bin/httpd-foreground" <<'EOF'
#!/bin/sh
echo "httpd-foreground: busybox httpd serving /usr/local/apache2/htdocs on port 80"
exec httpd -f -p 80 -h /usr/local/apache2/htdocs
EOF
chmod 755 "$work/httpd/usr/local/bin/httpd-foreground"
echo '<html><body><h1>It works!</h1></body></html>' > "$work/httpd/usr/local/apache2/htdocs/index.html"
layer httpd "$work/httpd"

# nonewprivs: the program setuid root.
mkdir -p "$work/nnp/usr/local/bin"
install -m 4755 "$work/bin/nnp" "$work/nnp/usr/local/bin/nnp"
layer nnp "$work/nnp"

# predefined-group: busybox's passwd/group plus default-user (1000) in group-defined-in-image
# (50000), what `adduser -u 1000 -D default-user && addgroup -g 50000 ... && addgroup ...` makes.
mkdir -p "$work/group/etc" "$work/group/home/default-user"
cp "$r/etc/passwd" "$r/etc/group" "$work/group/etc/"
echo 'default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh' >> "$work/group/etc/passwd"
printf 'default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n' >> "$work/group/etc/group"
layer group "$work/group"

# pause: just the program.
mkdir -p "$work/pause"
cp "$work/bin/pause" "$work/pause/pause"
layer pause "$work/pause"

# ---------------------------------------------------------------- images

index_entries=()
: > "$out/images.txt"

# image "REF..." CONFIG_JSON LAYER...: CONFIG_JSON is the "config" object of the image config.
image() {
  local refs=$1 cfg=$2 l c m diff_ids="" layers="" sep="" ref
  shift 2
  for l; do
    diff_ids+="$sep\"sha256:${LAYER[$l]}\""
    layers+="$sep{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:${LAYER[$l]}\",\"size\":${LAYER_SIZE[$l]}}"
    sep=,
  done
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "$cfg" "$diff_ids" > "$work/config.json"
  c=$(sha "$work/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
    "$c" "$(size "$work/config.json")" "$layers" > "$work/manifest.json"
  m=$(sha "$work/manifest.json")
  mv "$work/config.json" "$blobs/$c"
  mv "$work/manifest.json" "$blobs/$m"
  for ref in $refs; do
    index_entries+=("{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$m\",\"size\":$(size "$blobs/$m"),\"annotations\":{\"org.opencontainers.image.ref.name\":\"$ref\"},\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"}}")
    echo "$ref" >> "$out/images.txt"
  done
}

e2e=registry.k8s.io/e2e-test-images
cri=gcr.io/k8s-staging-cri-tools
path='"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"'
# cfg [USER] CMD_JSON [LABEL] [ENV] [ENTRYPOINT_JSON]
cfg() {
  local user=$1 cmd=$2 label=${3:-} env=${4:-} ep=${5:-} s
  s="{\"Env\":[$path${env:+,\"$env\"}]"
  [[ -n $user ]] && s+=",\"User\":\"$user\""
  [[ -n $ep ]] && s+=",\"Entrypoint\":$ep"
  [[ -n $cmd ]] && s+=",\"Cmd\":$cmd"
  [[ -n $label ]] && s+=",\"Labels\":{\"io.peapod.cri-tests.image\":\"$label\"}"
  printf '%s}' "$s"
}

image "$e2e/busybox:1.29-2" "$(cfg "" '["sh"]')" busybox
image "$e2e/nginx:1.14-2" "$(cfg "" '["/usr/sbin/nginx"]' nginx NGINX_PORT=80)" busybox nginx
image "$cri/hostnet-nginx-amd64:latest" "$(cfg "" '["/usr/sbin/nginx"]' hostnet-nginx NGINX_PORT=12003)" busybox nginx
image "$e2e/httpd:2.4.39-4" "$(cfg "" '["httpd-foreground"]')" busybox httpd
image "$e2e/nonewprivs:1.3" "$(cfg "" "" "" "" '["/usr/local/bin/nnp"]')" busybox nnp
image "$cri/test-image-user-uid:latest" "$(cfg 1002 '["sh"]' user-uid)" busybox
image "$cri/test-image-user-username:latest" "$(cfg www-data '["sh"]' user-username)" busybox
image "$cri/test-image-user-uid-group:latest" "$(cfg 1003:users '["sh"]' user-uid-group)" busybox
image "$cri/test-image-user-username-group:latest" "$(cfg www-data:users '["sh"]' user-username-group)" busybox
image "$cri/test-image-predefined-group:latest" "$(cfg 1000 '["sh"]' predefined-group)" busybox group
# Distinct images (a label each gives each its own config, so its own image id).
for t in test-image-latest:latest test-image-tag:test test-image-tag:all \
  test-image-1:latest test-image-2:latest test-image-3:latest; do
  image "$cri/$t" "$(cfg "" '["sh"]' "$t")" busybox
done
image "$cri/test-image-tags:1 $cri/test-image-tags:2 $cri/test-image-tags:3" \
  "$(cfg "" '["sh"]' test-image-tags)" busybox
image registry.k8s.io/pause:3.10.1 "$(cfg 65535:65535 "" "" "" '["/pause"]')" pause

(
  IFS=,
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' \
    "${index_entries[*]}" > "$work/oci/index.json"
)
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
tar -C "$work/oci" -cf "$out/images.tar" .
