{{/* Names and labels shared by every object of the chart. */}}
{{- define "sealvol.name" -}}sealvol{{- end -}}

{{- define "sealvol.fullname" -}}
{{- if eq .Release.Name "sealvol" -}}sealvol{{- else -}}{{ printf "%s-sealvol" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "sealvol.labels" -}}
app.kubernetes.io/name: sealvol
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sealvol.selector" -}}
app.kubernetes.io/name: sealvol
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The sealvol image: the node plugin and the cleanup controller run the same one. */}}
{{- define "sealvol.image" -}}
"{{ .Values.image.repository }}:{{ .Values.image.tag }}"
{{- end -}}

{{/* The cleanup controller's pods: a name of their own, so that the DaemonSet's selector
(sealvol.selector, immutable) never matches them. */}}
{{- define "sealvol.cleanupSelector" -}}
app.kubernetes.io/name: sealvol-cleanup
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The directory kubelet gives the driver for its socket. */}}
{{- define "sealvol.pluginDir" -}}{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}{{- end -}}

{{/* Whether kubelet passes the pod token in `secrets` (Kubernetes 1.35+, KEP-5538). */}}
{{- define "sealvol.tokenInSecrets" -}}
{{- $v := .Values.csiDriver.serviceAccountTokenInSecrets | toString -}}
{{- if eq $v "auto" -}}{{ semverCompare ">=1.35.0-0" .Capabilities.KubeVersion.Version }}{{- else -}}{{ $v }}{{- end -}}
{{- end -}}

{{/* csi-resizer's leader-election lease: "external-resizer-" and the driver name with every
character but [a-zA-Z0-9-] replaced by '-' (csi-lib-utils' SanitizeName; the schema keeps the
name from ending in one). */}}
{{- define "sealvol.resizerLease" -}}
external-resizer-{{ regexReplaceAll "[^a-zA-Z0-9-]" .Values.driverName "-" }}
{{- end -}}

{{/* The driver's --metrics-address: the pod's loopback unless exposed on the pod IP. */}}
{{- define "sealvol.metricsAddress" -}}
{{ if .Values.metrics.expose }}0.0.0.0{{ else }}127.0.0.1{{ end }}:{{ .Values.metrics.port }}
{{- end -}}

{{/* "true" when snapshots may be backed up to Azure Blob storage (backup.urls), after checking
what the driver needs for it: its own identity's client id and tenant. Empty when off. */}}
{{- define "sealvol.backup" -}}
{{- if .Values.backup.urls -}}
{{- if not .Values.backup.clientId -}}
{{- fail "backup.urls needs backup.clientId: the client id of the driver's own managed identity (federated with its ServiceAccount), which uploads the backups" -}}
{{- end -}}
{{- if not .Values.azure.tenantId -}}
{{- fail "backup.urls needs azure.tenantId: the tenant of the driver's own identity (backup.clientId)" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* Where the driver's projected ServiceAccount token for its backup identity is mounted, the
directory the Azure Workload Identity webhook uses (and the driver's --backup-token-file
default). */}}
{{- define "sealvol.backupTokenDir" -}}/var/run/secrets/azure/tokens{{- end -}}
