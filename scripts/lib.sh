# Shared by scripts/test and scripts/demo: finding and installing the servers.

have_rabbitmq() {
    [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || command -v rabbitmq-server >/dev/null
}
have_postgres() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null
}

# install_packages PKG...: apt-get install, as root or through sudo.
install_packages() {
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "need root or sudo to install packages" >&2; exit 1; }
        sudo=(sudo)
    fi
    # Without systemd the packages' postinst would try to start system services (on the default
    # ports); a policy-rc.d that answers 101 forbids that. Ours only if there is none already.
    local policy=/usr/sbin/policy-rc.d created_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        created_policy=1
    fi
    local status=0
    "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get -o DPkg::Lock::Timeout=600 install -y "$@" || status=$?
    [[ -n $created_policy ]] && "${sudo[@]}" rm -f "$policy"
    return "$status"
}

