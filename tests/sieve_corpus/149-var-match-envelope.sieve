# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables", "envelope", "subaddress"];
if envelope :matches :detail "to" "*" {
  fileinto "detail-${1}";
}
