#!/bin/sh
# Export secrets mounted as files, then run the command (default: vitals-bridge run).
#
# The bridge reads its settings from VITALS_* environment variables. Compose secrets
# and Kubernetes secret volumes arrive as files instead; each file in
# ${SECRETS_DIR:-/run/secrets} named like an environment variable we use becomes that
# variable: VITALS_AUTH__JWT_SECRET, VITALS_MQTT__PASSWORD, VITALS_DATABASE_URL, ...
# and PGPASSWORD (read by libpq when the database URL carries no password). A
# variable already set in the environment wins over the file.
set -eu

secrets_dir="${SECRETS_DIR:-/run/secrets}"
if [ -d "${secrets_dir}" ]; then
    for file in "${secrets_dir}"/*; do
        [ -f "${file}" ] || continue
        name="$(basename "${file}")"
        case "${name}" in
            VITALS_*|PGPASSWORD) ;;
            *) continue ;;
        esac
        # Only letters, digits and underscores make a variable name.
        case "${name}" in
            *[!A-Za-z0-9_]*) continue ;;
        esac
        if eval "[ -z \"\${${name}+set}\" ]"; then
            # $(cat) drops the trailing newline an editor leaves in the file.
            value="$(cat "${file}")"
            export "${name}=${value}"
        fi
    done
fi

exec "$@"
