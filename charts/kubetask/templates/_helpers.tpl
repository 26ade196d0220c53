{{- define "kubetask.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetask.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetask.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kubetask.natsName" -}}
{{ include "kubetask.fullname" . }}-nats
{{- end -}}

{{- define "kubetask.natsReplicas" -}}
{{ if .Values.nats.cluster.enabled }}{{ .Values.nats.cluster.replicas }}{{ else }}1{{ end }}
{{- end -}}

{{- define "kubetask.natsUrl" -}}
nats://{{ include "kubetask.natsName" . }}.{{ .Release.Namespace }}.svc:4222
{{- end -}}

{{- define "kubetask.configMap" -}}
{{ include "kubetask.fullname" . }}-config
{{- end -}}

{{- define "kubetask.tokensSecret" -}}
{{ .Values.auth.existingSecret | default (printf "%s-tokens" (include "kubetask.fullname" .)) }}
{{- end -}}

{{- define "kubetask.natsUsersSecret" -}}
{{ include "kubetask.fullname" . }}-nats-users
{{- end }}

{{- define "kubetask.executor" -}}
{{- $e := .Values.dispatcher.executor | default "kubernetes" -}}
{{- if not (has $e (list "kubernetes" "local")) -}}
{{- fail (printf "dispatcher.executor must be kubernetes or local, not %q" $e) -}}
{{- end -}}
{{ $e }}
{{- end }}

{{/* A size as both Kubernetes and nats-server read it (10Gi, 500M, 1073741824: whole numbers, for
nats-server takes no fraction), in bytes, for the settings that take bytes. */}}
{{- define "kubetask.bytes" -}}
{{- $q := toString . -}}
{{- if not (regexMatch "^[0-9]+(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$" $q) -}}
{{- fail (printf "%q is not a size (e.g. 10Gi, 500M, 1073741824)" $q) -}}
{{- end -}}
{{- $unit := regexFind "(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)$" $q -}}
{{- $factors := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 -}}
{{- mul (trimSuffix $unit $q | int64) (get $factors $unit) -}}
{{- end -}}
