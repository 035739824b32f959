# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if address :domain :matches "cc" "*.example.net" {
  fileinto "yes";
} else {
  fileinto "no";
}
