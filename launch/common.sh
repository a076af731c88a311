# Helpers sourced by the launch scripts: flags, one-sentence errors, shell quoting and --dry-run.

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
    echo "error: these scripts need bash 4.4 or newer (this is $BASH_VERSION; on macOS: brew install bash)." >&2
    exit 2
fi

die() {
    echo "error: $*" >&2
    exit 2
}

# The script's header comment (from line 2 to the first line that is not a comment), as help.
usage() {
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

# parse_flags "value flags" "switches" ARGS...: --flag=value, --flag value or --switch set FLAG (upper case,
# dashes as underscores); --help prints the usage.
parse_flags() {
    local values=" $1 " switches=" $2 " arg name value
    shift 2
    while (($#)); do
        arg=$1
        [[ $arg == -h || $arg == --help ]] && { usage; exit 0; }
        [[ $arg == --* ]] || die "unexpected argument '$arg'; flags look like --name=value (see --help)."
        name=${arg#--}
        name=${name%%=*}
        if [[ $switches == *" $name "* && $arg != *=* ]]; then
            value=1
            shift
        elif [[ $values == *" $name "* ]]; then
            if [[ $arg == *=* ]]; then
                value=${arg#*=}
                shift
            else
                (($# >= 2)) || die "--$name needs a value."
                value=$2
                shift 2
            fi
        else
            die "unknown flag --$name; see --help."
        fi
        name=${name//-/_}
        printf -v "${name^^}" '%s' "$value"
    done
}

# require VAR --flag example: the one-sentence error for a missing required flag.
require() {
    [[ -n ${!1:-} ]] || die "$2 is required, e.g. $2=$3."
}

# The words as one line that a shell reads back as the same words.
quote() {
    local out=() word
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$word")
        elif [[ $word == *\'* && $word != *[\$\`\\\"!]* ]]; then
            out+=("\"$word\"")
        else
            out+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

# Runs a command, or with DRY_RUN=1 prints it (runnable) instead.
run() {
    if [[ ${DRY_RUN:-} == 1 ]]; then
        quote "$@"
    else
        "$@"
    fi
}
