"""A checker of the Pod Security Standards' "restricted" profile (which includes "baseline").

Written from the Kubernetes documentation of the standards (concepts/security/pod-security-standards),
for pod specs as the API serializes them (camelCase). `restricted_violations` returns one line
per broken rule, naming the rule and where; an empty list means the pod would be admitted in a
namespace labelled `pod-security.kubernetes.io/enforce: restricted`.
Plain Python.
"""

from __future__ import annotations

# Volume types the restricted profile allows.
ALLOWED_VOLUME_TYPES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                  "persistentVolumeClaim", "projected", "secret"})
# The only capability a restricted container may add.
ADDABLE_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
ALLOWED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})
# Baseline's safe sysctls.
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                          "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                          "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                          "net.ipv4.tcp_keepalive_probes"})
ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def _containers(pod: dict):
    for kind in CONTAINER_LISTS:
        for container in pod.get(kind) or []:
            yield f"{kind}[{container.get('name')}]", container


def _security_contexts(pod: dict):
    """(where, security context) of the pod, then of each container."""
    yield "pod", pod.get("securityContext") or {}
    for where, container in _containers(pod):
        yield where, container.get("securityContext") or {}


def restricted_violations(pod: dict) -> list[str]:
    """What keeps `pod` (a PodSpec) out of a restricted namespace; [] when nothing does."""
    problems: list[str] = []
    pod_context = pod.get("securityContext") or {}
    containers = list(_containers(pod))

    # Baseline.
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"host namespaces: pod sets {field}: true")
    for volume in pod.get("volumes") or []:
        types = set(volume) - {"name"}
        if "hostPath" in types:
            problems.append(f"hostPath volumes: volume {volume.get('name')!r} is a hostPath")
        elif not types <= ALLOWED_VOLUME_TYPES:
            problems.append(f"volume types: volume {volume.get('name')!r} is {sorted(types - ALLOWED_VOLUME_TYPES)}, "
                            f"allowed {sorted(ALLOWED_VOLUME_TYPES)}")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"sysctls: pod sets {sysctl.get('name')!r}")
    for where, container in containers:
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"privileged containers: {where} is privileged")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"host ports: {where} uses hostPort {port['hostPort']}")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"/proc mount type: {where} sets procMount {context['procMount']!r}")
    for where, context in _security_contexts(pod):
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"HostProcess: {where} sets windowsOptions.hostProcess")
        if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"AppArmor: {where} sets appArmorProfile Unconfined")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in ALLOWED_SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            problems.append(f"SELinux: {where} sets seLinuxOptions {selinux}")

    # Restricted.
    pod_non_root = pod_context.get("runAsNonRoot") is True
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP:
        problems.append(f"seccomp: pod sets seccompProfile {pod_seccomp!r}")
    for where, context in _security_contexts(pod):
        if context.get("runAsUser") == 0:
            problems.append(f"running as non-root user: {where} sets runAsUser 0")
    if pod_context.get("runAsNonRoot") is False:
        problems.append("running as non-root: pod sets runAsNonRoot false")
    for where, container in containers:
        context = container.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"privilege escalation: {where} does not set allowPrivilegeEscalation: false")
        non_root = context.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            problems.append(f"running as non-root: {where} is not runAsNonRoot (nor is the pod)")
        seccomp = (context.get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in ALLOWED_SECCOMP:
            problems.append(f"seccomp: {where} sets seccompProfile {seccomp!r}")
        elif seccomp is None and pod_seccomp not in ALLOWED_SECCOMP:
            problems.append(f"seccomp: {where} has no RuntimeDefault/Localhost seccomp profile (nor has the pod)")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"capabilities: {where} does not drop ALL")
        added = set(capabilities.get("add") or []) - ADDABLE_CAPABILITIES
        if added:
            problems.append(f"capabilities: {where} adds {sorted(added)} (only NET_BIND_SERVICE may be added)")
    return problems
