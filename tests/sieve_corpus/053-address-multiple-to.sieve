# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if address :all :is "to" "carol@example.com" {
  fileinto "yes";
} else {
  fileinto "no";
}
